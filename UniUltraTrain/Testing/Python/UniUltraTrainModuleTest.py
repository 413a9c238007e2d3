"""Slicer self-test (run by ctest through slicer_add_python_unittest): UniUltraTrain export and command line."""

import unittest

import slicer


class UniUltraTrainModuleTest(unittest.TestCase):
    def test_module(self):
        slicer.util.selectModule("UniUltraTrain")
        import UniUltraTrain

        test = UniUltraTrain.UniUltraTrainTest()
        test.runTest()
