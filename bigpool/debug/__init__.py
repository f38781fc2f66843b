"""The driver's debug endpoint: status page, cluster-wide profiles and expvars over HTTP.

``server`` serves it (started by ``bigpool.start(debug=...)``), ``cluster`` gathers from the
machines, ``pprof``, ``flamegraph`` and ``status`` turn what was gathered into files and pages
without I/O, and ``cli`` is ``python -m bigpool status|profile|threads``. Nothing below this
package imports it; ``bigpool.machine`` loads it only when a debug address is given.
"""
