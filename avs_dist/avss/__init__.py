"""AVSBench-semantic (AVSS): the 71-class task of 5- and 10-frame clips (avsbench-format.md
"AVSBench-semantic").

Modules: classes (label2idx.json, the colour palette, colour masks -> class indices),
layout (metadata.csv -> one record per clip, sets v1s / v1m / v2), resize (the reference's
frame and mask resizing), clips (one clip read and checked for packing), objects (one box and
class per labelled object and frame from the class-index masks, and the crops they cut),
samples (the shard sample of a clip), synth (the synthetic AVSS release), pictures (a clip's
colour masks for `avs-dist inspect`), metrics (the reference's mIoU / F exactly and the correct
figures), report (the per-class table).
"""
