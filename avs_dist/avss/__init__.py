"""AVSBench-semantic (AVSS): the 71-class task of 5- and 10-frame clips (data, model, losses, metrics)."""
