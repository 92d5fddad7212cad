"""The chapters' experiments and figures: what each notebook calls to run a study and draw its plots.

* :mod:`.plots`: the book's colours and figure style; :mod:`.interactive`: kernel-free slider figures;
* :mod:`.selection`: how sparse FF layers pick their units, the controller experiments (chapter 2);
* :mod:`.quality`: loss targets and quality tables of the trained models (chapter 3);
* :mod:`.qkv_study`: sparse QKV parameter counts, permutations, attention maps (chapter 4);
* :mod:`.gap`: the quality study behind chapter 3's "Closing the gap" (``python -m sparse_tutorial.studies``);
* :mod:`.decode_plots`: the decoding-speed figures (chapter 5).
"""
