"""Training: the loop (loop.py) and the components it calls, each owning its state.

    session.py      Session: builds and wires the components for one rank, resumes, finishes
    loop.py         train(session, stop): the loop, one optimizer step per iteration
    step.py         train_step(strategy, micro_batches, loss_cfg): micro-steps, backward, optimizer step
    strategy.py     DDP / DeepSpeed ZeRO 1-3 behind one interface
    optim.py        optimizer and lr schedule
    state.py        TrainState (step, best score), RankState (RNG, per-rank BN statistics)
    checkpoint.py   Checkpointer and the checkpoint format; which folders are valid
    validate.py     Validator: validation when due, the best checkpoint, the final test evaluation
    logger.py       RunLogger: decides when to log; sinks.py: JSONL, TensorBoard, terminal
    stop.py         StopRequest: the launcher's request to checkpoint and end

The data position is the loader's (data/loader.py TrainStream). Launching (torchrun, Slurm)
lives in avs_dist/launch and is not imported here.
"""
