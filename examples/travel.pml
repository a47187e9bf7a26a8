<?xml version="1.0" encoding="UTF-8"?>
<!-- A travel-assistant schema in the style of the Prompt Cache paper (Gim et al., MLSys 2024).
     Every module is encoded once; a prompt picks the modules it needs and fills parameters. -->
<schema name="travel">
  <system>
    You are a friendly and knowledgeable travel agent. Answer with concrete, practical
    suggestions and mention costs in the local currency when you can.
  </system>

  <module name="travel">
    The traveller asks for help planning a trip. Use the destination notes below.
    <union scaffold="domestic">
      <module name="domestic">
        The trip stays within the United States. Domestic flights are frequent; trains are
        practical on the East Coast, and renting a car is common everywhere else.
        <module name="miami">
          Miami: beaches from South Beach to Key Biscayne, Cuban food in Little Havana, Art Deco
          walking tours. Hurricane season runs from June to November.
        </module>
        <module name="new-york">
          New York: museums (the Met, MoMA), Broadway shows, Central Park. The subway runs all
          night; a 7-day unlimited MetroCard pays off after about a dozen rides.
        </module>
      </module>
      <module name="overseas">
        The trip is international. Check passport validity (six months is a common rule), visa
        requirements and travel insurance before booking.
        <module name="tokyo">
          Tokyo: Shibuya and Shinjuku for nightlife, Asakusa for temples, Tsukiji outer market for
          breakfast. A Suica card covers trains, subways and convenience stores.
        </module>
        <module name="paris">
          Paris: the Louvre (book a time slot), Montmartre, day trips to Versailles. Most museums
          are free on the first Sunday of the month from October to March.
        </module>
      </module>
    </union>
  </module>

  <module name="trip-plan">
    Write a day-by-day itinerary for a trip lasting <parameter name="duration" length="4" scaffold="a few days"/>.
  </module>

  <module name="budget" cache="false">
    Keep the total cost under <parameter name="amount" length="6"/> per person.
  </module>
</schema>
