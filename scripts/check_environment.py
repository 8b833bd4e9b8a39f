"""Fails loudly when the environment is not what the project needs (run by scripts/setup.sh)."""
import importlib.metadata as metadata
import sys


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main():
    problems = []
    faiss_dists = {name: installed(name) for name in ("faiss-gpu", "faiss-cpu", "faiss")}
    present = {name: version for name, version in faiss_dists.items() if version}
    if len(present) != 1:
        problems.append(f"exactly one faiss distribution must be installed, found {present or 'none'}"
                        " (faiss-cpu and faiss-gpu overwrite each other's 'faiss' module)")
    try:
        import asmk_index._kernels  # noqa: F401  compiled ASMK* kernels
    except ImportError as error:
        problems.append(f"asmk_index._kernels is not built ({error}); run 'pip install -e .'")
    import faiss
    import torch
    print(f"faiss {faiss.__version__} ({next(iter(present), '?')}), GPUs seen by faiss: "
          f"{faiss.get_num_gpus()}; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if problems:
        for problem in problems:
            print("environment problem:", problem, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
