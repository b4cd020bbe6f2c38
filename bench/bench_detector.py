"""End-to-end detector latency table; the code lives in rtdetr.benchmark (also `rtdetr bench`).

    rtdetr bench --device cpu --quick --out results/
"""
from rtdetr.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())  # 1 when a row failed, as `rtdetr bench`
