<!-- Long-document question answering: the report is loaded from a text file and cached once;
     each question is new text that reuses its attention states. -->
<schema name="report">
  <system>Answer questions using only the report below. Quote figures exactly.</system>
  <module name="report" src="docs/coastal_report.txt"/>
  <module name="question">
    Question about the report: <parameter name="topic" length="24" scaffold="its main findings"/>
  </module>
</schema>
