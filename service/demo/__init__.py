"""The bundled example: a digits teacher/student builder and a drifting traffic generator.

Everything here uses scikit-learn's bundled `load_digits` (1,797 8x8 images shipped
inside the package); nothing is downloaded.
"""
