"""The autograder of HW5 (docs/grading.md): handout.py writes the students' version, grade.py
grades a submission with checks.py's checks, package.py writes the Gradescope autograder zip."""
