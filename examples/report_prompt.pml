<prompt schema="report">
  <report/>
  <question topic="the cost of the sea wall"/>
  <user>Summarize the answer in two sentences.</user>
</prompt>
