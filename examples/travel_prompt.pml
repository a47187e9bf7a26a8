<!-- Selects the overseas branch of the travel union with Tokyo, and fills the trip length. -->
<prompt schema="travel">
  <travel>
    <overseas>
      <tokyo/>
    </overseas>
  </travel>
  <trip-plan duration="3 days"/>
  <user>
    I land at Haneda on Friday morning. Which neighbourhood should I stay in, and what should I
    do on the first day?
  </user>
</prompt>
