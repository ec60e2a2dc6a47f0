"""spo_ray: Soft Preference Optimization on Ray Train, Ray Data and vLLM."""

__version__ = "0.1.0"
