"""carwash-gateway: the edge gateway of a car-wash site."""

__version__ = "0.1.0"
