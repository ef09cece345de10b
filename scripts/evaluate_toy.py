"""Measure that the toy world's models learn (README, "The toy world"): ``toy.evaluate``.

    python scripts/evaluate_toy.py --out outputs/toy_eval     # tables in outputs/toy_eval/results.md
"""
import sys

from toy.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
