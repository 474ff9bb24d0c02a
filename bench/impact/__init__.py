"""The impact benchmark's pieces: the replaced reading-level estimator, for comparison."""
