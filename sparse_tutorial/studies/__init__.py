"""The chapters' experiments and figures: what each notebook calls to run a study and draw its plots.

* :mod:`.plots`: the book's colours and figure style; :mod:`.interactive`: kernel-free slider figures;
* :mod:`.selection`: how sparse FF layers pick their units, the controller experiments (chapter 2);
* :mod:`.quality`: loss targets and quality tables of the trained models (chapter 3);
* :mod:`.qkv_study`: sparse QKV parameter counts, permutations, attention maps (chapter 4);
* :mod:`.gap`: the quality study behind chapter 3's "Closing the gap" (``python -m sparse_tutorial.studies``);
* :mod:`.decode_plots`: the decoding-speed figures (chapter 5);
* :mod:`.relatives`: the controller FF beside MoE and PKM (chapter 6);
* :mod:`.text_slider`: kernel-free sliders over texts; :mod:`.readings`: the sentences chapters print from their
  numbers; :mod:`.conv_anatomy`: the conv QKV layer by hand (chapter 4);
* :mod:`.record`: each chapter's run record; :mod:`.claims`: the closing page's table of claims.
"""
