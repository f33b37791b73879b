"""Features that stand on their own (gateway, swap groups, containers): each one
folder with declared hooks (:mod:`unitgen.features.base`), listed in
:mod:`unitgen.features.registry`."""
