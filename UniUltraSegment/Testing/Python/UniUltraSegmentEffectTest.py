"""Slicer self-test (run by ctest through slicer_add_python_unittest): drives the UniUltra effect."""

import unittest

import slicer


class UniUltraSegmentEffectTest(unittest.TestCase):
    def test_effect(self):
        slicer.util.selectModule("UniUltraSegment")
        import UniUltraSegment

        test = UniUltraSegment.UniUltraSegmentTest()
        test.runTest()
