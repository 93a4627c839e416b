"""One module per stage; each is a small object driven by ``pipeline.runner.StageRunner``."""
