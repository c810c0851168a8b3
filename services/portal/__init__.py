"""Portal: a web page for every run (live logs, metric charts, files), experiments, the fleet and the models."""
