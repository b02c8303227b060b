"""Kubernetes targets: which pod (``resolve``), where the agent runs
(``placement``), how we reach it (``portforward``), all through the one
client module (``client``); ``session`` strings them together. Imported only
when a Kubernetes target is used."""
