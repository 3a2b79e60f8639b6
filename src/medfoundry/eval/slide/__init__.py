"""Slide-level evaluation: whole-slide images as bags of tile features, classified by a slide aggregator.

A slide manifest (slide path, slide label, patient, optional split) is read into a
:class:`~medfoundry.eval.labelled_set.LabelledSet` whose items are slides (:mod:`.manifest`); without a split
column the slides are split by patient. Each slide's tissue tiles at a fixed µm/px (the sampler of
``data.kind=wsi``) go through the frozen backbone once and are cached (:mod:`.tiles`, :mod:`.cache`). Two
aggregators turn a slide's tile features into a slide prediction: mean pooling with the logistic-regression probe
of the ``linear`` task, and gated attention MIL (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
Learning", ICML 2018; :mod:`.aggregators`, :mod:`.fit`). :mod:`.evaluate` reports test AUC with bootstrap
intervals beside the majority-class baseline, and :mod:`.heatmap` draws each test slide's attention over its
tiles on the slide thumbnail. The registered task ``slide`` (``needs="slides"``) is :func:`.evaluate.run_task`;
its inputs are a :class:`.context.SlideEvalContext` (:mod:`.settings` holds the knobs).

Modules are imported on use: importing this package imports nothing heavy.
"""
