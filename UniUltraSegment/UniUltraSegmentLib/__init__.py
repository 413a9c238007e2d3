"""UniUltraSegment library: MRML logic (no Qt) and the Segment Editor effect (Qt, imported lazily)."""
