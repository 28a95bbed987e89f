"""AVSBench-semantic (AVSS): the 71-class task (avsbench-format.md "AVSBench-semantic")."""
