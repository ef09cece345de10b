"""The BLIP-2 paper's evaluations (``scripts/evaluate_blip2.py``): ``annotations`` reads the standard
files, ``tasks`` holds each task's prompt, decoding, result format and scores (``blip2.metrics``),
``partial`` keeps the results so far for a resumable run, ``runner`` generates what is missing."""
