"""The medfoundry application: the ``medfoundry`` command line, the demo, the sweep driver and the benchmark drivers.

It is built on the library (:mod:`medfoundry`) and is the only place that parses argv, installs packages or
prints for a terminal; the library never imports it (tests/architecture/test_architecture.py). The split follows
open_clip's ``open_clip`` / ``open_clip_train``.
"""
