"""Entry points that start avs-dist training: torchrun (train.py) and Slurm via submitit (submit.py)."""
