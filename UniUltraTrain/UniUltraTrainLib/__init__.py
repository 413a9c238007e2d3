"""Qt-free logic of the UniUltraTrain module: curate datasets from the scene, run training."""
