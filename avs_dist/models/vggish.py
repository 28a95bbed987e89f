"""Frozen VGGish audio embedder (avsbench-format.md §2).

Layer layout and indices match the released PyTorch weights `vggish-10086976.pth`:
features.{0,3,6,8,11,13} are the convs, embeddings.{0,2,4} the linears. The final 512x6x4
map is flattened in (H, W, C) order because the weights were converted from TensorFlow,
which is channels-last. No PCA postprocessing: AVSBench feeds the raw 128-d output.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

_CONV_PLAN = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
EMBED_DIM = 128


def _features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 1
    for v in _CONV_PLAN:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


RANDOM_INIT_SEED = 0


class VGGish(nn.Module):
    """log-mel examples [N, 1, 96, 64] -> embeddings [N, 128]. Always frozen and in eval mode.

    Without a weights file the network is a fixed random function: He-initialised from its own
    generator (seed RANDOM_INIT_SEED), so every process and every later evaluation rebuilds
    exactly the same VGGish. That is why checkpoints need not carry its 72M frozen weights
    (models/system.py). PyTorch's default init would make it nearly deaf: its embeddings come
    out almost constant (std ~1e-4), so a model could not learn from the audio at all.
    """

    def __init__(self):
        super().__init__()
        self.features = _features()
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, EMBED_DIM), nn.ReLU(inplace=True),
        )
        self.reset_parameters()
        self.requires_grad_(False)
        self.eval()
        # Embeddings already computed, by the bytes of one video's log-mel (embed_videos).
        self._memo: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_pre_hook(lambda *args, **kwargs: self._memo.clear())

    @torch.no_grad()
    def reset_parameters(self, seed: int = RANDOM_INIT_SEED) -> None:
        if any(p.is_meta for p in self.parameters()):
            return  # built on the meta device: the real weights arrive later
        g = torch.Generator(device="cpu").manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = torch.empty(m.weight.shape)
                nn.init.kaiming_normal_(w, nonlinearity="relu", generator=g)
                m.weight.copy_(w)
                m.bias.zero_()

    def train(self, mode: bool = True):
        # Frozen feature extractor: a parent's .train() must not change it.
        return super().train(False)

    @torch.no_grad()
    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        if logmel.dim() != 4 or tuple(logmel.shape[1:]) != (1, 96, 64):
            raise ValueError(f"VGGish expects log-mel [N, 1, 96, 64], got {tuple(logmel.shape)}")
        x = self.features(logmel)  # [N, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (H, W, C) order
        return self.embeddings(x)

    # A bound on the memo: AVSBench has ~5k (S4) to ~12k (AVSS) videos, 2.5 KB each in fp32.
    MEMO_MAX_VIDEOS = 100_000

    @torch.no_grad()
    def embed_videos(self, audio: torch.Tensor) -> torch.Tensor:
        """log-mel [B, T, 1, 96, 64] -> embeddings [B, T, 128], the same dtype and device.

        VGGish is frozen and deterministic, and each video's audio is the same every epoch, so
        on CPU, where VGGish is ~45% of a `tiny` training step (2 cores, measured), each
        video's embeddings are computed once and looked up by the bytes of its log-mel after
        that. Each video is computed on its own ([T, 1, 96, 64]): a convolution's low bits depend
        on the batch it runs in, and a memo filled in one batch order must equal what a resumed
        run, in another order, would compute. Off on CUDA (hashing would copy the audio to the
        host, and VGGish is a small part of a GPU step). When ZeRO-3 partitions the weights the
        videos are still computed one by one (so ZeRO-3 gets the embeddings DDP gets) but not
        memoized: its gathers are collectives every rank must enter, and a memo hit on one rank
        would leave the others waiting (every rank's training micro-batch has the same number
        of videos, config.global_batch, so each enters the same number of forwards).
        """
        b, t = audio.shape[:2]
        if audio.device.type != "cpu":
            return self(audio.reshape(b * t, *audio.shape[2:])).reshape(b, t, EMBED_DIM)
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            return torch.stack([self(a) for a in audio])
        keys = [(a.dtype, tuple(a.shape), hashlib.blake2b(a.contiguous().view(torch.uint8).numpy(),
                                                           digest_size=16).digest()) for a in audio]
        out = []
        for key, a in zip(keys, audio):
            emb = self._memo.get(key)
            if emb is None:
                emb = self(a)
                if len(self._memo) < self.MEMO_MAX_VIDEOS:
                    self._memo[key] = emb
            out.append(emb)
        return torch.stack(out)
