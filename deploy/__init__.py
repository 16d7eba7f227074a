"""Deployment on Ray: `kvrelay serve` places the prefill workers and decode groups as actors, runs the router,
and shuts everything down on Ctrl-C. `default_model/` is the embedded demo checkpoint."""

import os

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
