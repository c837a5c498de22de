"""Videos in, model inputs out: decoding (ffmpeg), the exact resize and crops, clip sampling, input
lists, class names and the batched extract/classify engine."""
