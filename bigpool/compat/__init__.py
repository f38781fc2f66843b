"""Front doors shaped like the standard library's, for code that should run on machines.

``import bigpool.compat.multiprocessing as multiprocessing`` and
``import bigpool.compat.futures as futures`` give modules that look like
``multiprocessing`` and ``concurrent.futures``, with their pools running on bigpool.
"""
