"""Plain Flower FedAvg on digits (benchmarks/rounds.py's baseline)."""
