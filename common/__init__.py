"""The bottom layer: what every other package may build on.

``common`` imports nothing of this project.  It holds the one error
foundation (:mod:`common.errors`) and the rules several packages must apply
identically (:mod:`common.uuids`).  ``rpc``, ``storage`` and ``virt`` import
it; it imports none of them.
"""
