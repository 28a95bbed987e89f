"""Raw videos: AVSBench's preprocessing (frames, 16 kHz wav, log-mel) and predictions on videos.

- ffmpeg.py     one ffmpeg run per video (imageio-ffmpeg's binary): the reference's frames and
                moviepy's audio stream from a single decode; VideoError
- timing.py     which frame stands for each second (the reference's 15/16 rule), windows
- audio.py      moviepy 1.0.3's 16 kHz wav samples from the 44.1 kHz stream, by moviepy's own code
- reference.py  the reference recipe itself (imageio reader + cv2.resize + moviepy), the oracle
                of the tests and of `avs-dist bench extract`
- extract.py    `avs-dist extract`'s library: raw_videos/ -> visual_frames/, audio_wav/,
                audio_log_mel/ (parallel, resumable, one report of the bad videos)
- bench.py      `avs-dist bench extract`
"""
