"""asmk_index: the ASMK* engine and the two-stage index, on descriptors only (numpy, faiss, h5py).

    from asmk_index import Codebook, AsmkIndex, GlobalIndex, TwoStageIndex
    codebook = Codebook.train(descriptors, 65536)                 # faiss k-means (GPU when present)
    index = AsmkIndex(codebook)                                    # binarized ASMK*, alpha 3, tau 0
    index.add(descriptors, image_ids)                              # one int id per descriptor
    ids, scores = index.search(query_descriptors, k=100)          # full inverted-file search
    scores = index.score(query_descriptors, candidate_ids)         # stage 2: only those images
    index.save("asmk_dir"); index = AsmkIndex.load("asmk_dir")

Two stages and more (see ``two_stage``): ``TwoStageIndex.create(codebook, 512, local_features=True)``
keeps each image's local features (word, signature, x, y, scale: ``LocalFeatureStore``) for
spatial verification (``verification``, OpenCV, imported on first use); ``fusion`` ranks the
shortlist by rules that do not depend on the scores' scales; ``GlobalIndex`` offers alpha-QE and
alpha-DBA.

No torch here: any extractor's local descriptors (MDA, HOW, FIRe, DELG...) can be indexed.
The compiled loops use OpenMP threads (``OMP_NUM_THREADS``, or :func:`set_num_threads`); results
are the same for any thread count.
"""
from ._kernels import max_threads as get_num_threads
from ._kernels import set_max_threads as set_num_threads
from .asmk import AsmkIndex, AsmkParams
from .codebook import Codebook
from .feature_file import FeatureFile, FeatureFileWriter
from .fusion import Fusion
from .global_index import GlobalIndex
from .interop import codebook_from_asmk_state
from .local_store import ImageFeatures, LocalFeatureStore
from .persistence import IndexFormatError
from .two_stage import SearchResult, TwoStageIndex

__all__ = ["AsmkIndex", "AsmkParams", "Codebook", "FeatureFile", "FeatureFileWriter", "Fusion",
           "GlobalIndex", "ImageFeatures", "IndexFormatError", "LocalFeatureStore", "SearchResult",
           "TwoStageIndex", "codebook_from_asmk_state", "get_num_threads", "set_num_threads"]
