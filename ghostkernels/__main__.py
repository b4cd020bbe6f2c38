"""python -m ghostkernels: print which backends are available and why any is not."""
from ghostkernels import backend_report

if __name__ == "__main__":
    print(backend_report())
