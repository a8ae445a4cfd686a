"""Combine: model soups from fine-tuned run folders, checked, cooked, written (`hubtune soup`)."""
