from mailplat_subject_tag import SubjectTaggerFactory

subjectTag = SubjectTaggerFactory()
