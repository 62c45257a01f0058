"""Efficient pre-training: masked-LM data and masking, ELECTRA replaced-token detection and
progressive stacking (the recipe is `efficient_nlp.recipes.pretrain`)."""
