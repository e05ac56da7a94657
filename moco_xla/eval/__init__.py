"""How good is a pre-trained encoder: ``python -m moco_xla.eval knn | linear | semisup``.

command.py    the command line, the job every replica runs, the printed table
encoder.py    the checkpoint's backbone, read once, and the seeded random one, copied per use
knn.py        the weighted kNN monitor (also training's)
readout.py    which features the kNN reads: the backbone or the projection MLP's hidden layer
lincls.py     MoCo's linear-probe protocol (``eval linear``)
probe.py      linear probes on frozen features; the raw-pixel logistic regression
fit.py        the supervised SGD loop on every replica; fine-tuning and from-scratch classifiers
distill.py    a student learning a frozen teacher's predictions
labelprop.py  labels spread over a kNN graph
pixel_knn.py  the same kNN on the raw centred pixels: the reference every run prints beside its kNN
rows.py       the few-label study's row catalogue (key, title, kind, teacher, learning rate, budget)
fewlabels.py  the few-label study (``eval semisup``): one function per row kind
fewlabels_split.py  its labelled / unlabelled / scored images and each student's view of them
"""
