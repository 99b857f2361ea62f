"""paco_ray: Parametric Contrastive Learning for long-tailed classification on Ray."""
__version__ = "0.2.0"
