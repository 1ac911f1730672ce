"""The job API: the HTTP edge of editfarm (FastAPI).

Imports only ``broker`` and ``storage`` of ours; never ``workers``.
"""
