"""The Lightning-free K-FAC core: layers, discovery, capture, factors, linear algebra, comms.

Imports only torch and ``lightning_kfac.config`` (never Lightning or Hydra).
"""
