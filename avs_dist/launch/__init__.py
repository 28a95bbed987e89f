"""Launching training: everything that knows about processes, signals, torchrun and Slurm.

    args.py      the flags every training launcher shares, and `check_run`: every check a run
                 can fail before any process starts (config, batch split, runtime, shards)
    rank.py      one rank (`torchrun -m avs_dist.launch.rank`, `python -m avs_dist.train`)
    local.py     `avs-dist train`: N local ranks under torchrun, supervised
    signals.py   stop signals -> StopRequest, and the watchdog that ends orphaned ranks
    slurm.py     TrainJob: the submitit callable run by every Slurm task
    submit.py    `avs-dist submit`: submit TrainJob(s) with submitit

avs_dist/train knows nothing of this package: it is handed a StopRequest (train/stop.py).
"""
