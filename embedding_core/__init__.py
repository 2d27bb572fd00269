"""The floor under the suite: the maths that methods (lightning_modules), callbacks and data modules share.

search (exact top-k and k-means, the one module that imports faiss), metrics (kNN, Recall@K, NMI),
features (a split's embeddings from a model, gathered over ranks), distributed (rows across DDP ranks),
distances (L2 normalisation, clamped Euclidean distances), clusters (cluster centres), seeds (per-sample and
per-step seeds, a private random stream). It imports nothing else of the suite; everything may import it.
See docs/layout.md.
"""
