"""The parts of the tune stage (:mod:`forgetting_ray.stages.tune`) that are not its recipe.

* :mod:`~forgetting_ray.tuning.objectives`: what a trial reports once it has trained (a validation NLL
  or an eval mean);
* :mod:`~forgetting_ray.tuning.callbacks`: the Ray Train and Ray Tune callbacks of a search (training
  reports with the online NLL, the trials' MLflow runs, the progress bar, the watch on pending trials).
"""
