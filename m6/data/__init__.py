"""Data curation: sources → filters → dedup → WebDataset shards (``m6.shards/v1``), tokenizer, demo corpus.

Modules: ``sources`` (format detection, partitions, readers), ``filters`` (caption and image
checks, resize/encode), ``dedup`` (exact, pHash, MinHash LSH), ``worker`` (one partition),
``curate`` (the job), ``shards`` (writer, reader, manifest, split), ``tokenizer`` (byte-level
BPE), ``report`` (HTML), ``synth`` (the demo corpus), ``cli`` (``m6 data synth``, ``m6 curate``).
"""
