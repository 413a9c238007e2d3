"""UniUltra Web: the UniUltra Segment Editor effect in a browser, on Slicer's core (trame-slicer).

`python -m uniultra_web` / `uniultra web`; see README "UniUltra Web".  The interaction is the
desktop effect's `UniUltraSegmentLib.controller.InteractionController`."""
