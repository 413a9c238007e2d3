"""UniUltraSegment library: Qt-free MRML logic (controller, geometry, segments, sequences, models)."""
