"""The built-in study files, shipped with the package: ``nlstm-study --space smoke`` finds
``smoke.yaml`` here from any folder (``study.catalog``)."""
