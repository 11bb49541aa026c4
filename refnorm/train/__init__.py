"""Training a small network on real data with refnorm layers."""
