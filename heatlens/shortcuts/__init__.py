"""The shortcut audit: is the model looking at the object or at the background?"""
